/* Uses libmatch.so.1; answers "lib N" with lib_work(N). */
#include <stdio.h>
#include <string.h>
int lib_work(int);
int lib_len(const char *);
int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        int n = 0;
        if (!strncmp(line, "hello", 5)) { printf("ready\n"); continue; }
        sscanf(line, "lib %d", &n);
        int a = lib_work(n), b = lib_len("xyz");
        printf("%d %d\n", a, b);
    }
    return 0;
}
