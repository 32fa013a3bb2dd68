#include <stdio.h>

int hash(int x);

int main(void)
{
	printf("%d\n", hash(42));
	return 0;
}
