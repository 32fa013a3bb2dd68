#include <stdio.h>

int table_sum(void);

int main(void)
{
	printf("%d\n", table_sum());
	return 0;
}
