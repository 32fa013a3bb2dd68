#include <stdio.h>
#include <unistd.h>

int check(int x);
int scale(int x);

int main(void)
{
    for (int i = 0;; i++) {
        printf("%d %d\n", check(i % 7), scale(i));
        fflush(stdout);
        sleep(1);
    }
}
