#include <stdio.h>

int effective_limit(int requested);

int main(void)
{
	printf("%d\n", effective_limit(0));
	return 0;
}
