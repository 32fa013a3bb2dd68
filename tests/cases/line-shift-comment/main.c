#include <stdio.h>

int adjust(int v);
int checked_div(int a, int b);

int main(void)
{
	printf("%d\n", checked_div(adjust(9), 2));
	return 0;
}
