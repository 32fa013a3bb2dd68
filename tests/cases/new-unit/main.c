#include <stdio.h>
#include <stdlib.h>

int compute(int x);

int main(int argc, char **argv)
{
	int v = argc > 1 ? atoi(argv[1]) : 5;

	printf("%d\n", compute(v));
	return 0;
}
