#include <stdio.h>

int spend(int n);

int main(void)
{
	printf("%d\n", spend(2));
	return 0;
}
