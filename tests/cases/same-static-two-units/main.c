#include <stdio.h>

int fa(int x);
int fb(int x);

int main(void)
{
	printf("%d %d\n", fa(1), fb(2));
	return 0;
}
