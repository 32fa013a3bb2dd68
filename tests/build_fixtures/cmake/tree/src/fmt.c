#include <stdio.h>

void show(int n)
{
	printf("count=%d\n", n);
}
