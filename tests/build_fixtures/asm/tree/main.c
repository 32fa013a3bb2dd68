#include <stdio.h>

long twice(long x);

int main(void)
{
	printf("%ld\n", twice(21));
	return 0;
}
