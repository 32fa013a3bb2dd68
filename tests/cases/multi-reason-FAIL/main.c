#include <stdio.h>

int over_limit(int v);
int walk(int n);
int effective_limit(int requested);

int main(void)
{
	printf("%d %d %d\n", over_limit(15), walk(5), effective_limit(0));
	return 0;
}
