#include <stdio.h>

int add_one(int x);

int main(void)
{
	printf("%d\n", add_one(41));
	return 0;
}
