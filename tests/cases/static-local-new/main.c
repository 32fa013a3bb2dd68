#include <stdio.h>

int tick(int step);

int main(void)
{
	tick(1);
	printf("%d\n", tick(2));
	return 0;
}
