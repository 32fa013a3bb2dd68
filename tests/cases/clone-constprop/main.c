#include <stdio.h>

int total_a(int x);
int total_b(int x);

int main(void)
{
	printf("%d %d\n", total_a(5), total_b(5));
	return 0;
}
