#include <stdio.h>

int walk(int n);

int main(void)
{
	printf("%d\n", walk(5));
	return 0;
}
