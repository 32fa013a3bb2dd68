#include <stdio.h>

int foo_compute(int x);
int foo_version(void);

int main(void)
{
	printf("%d %d\n", foo_compute(6), foo_version());
	return 0;
}
