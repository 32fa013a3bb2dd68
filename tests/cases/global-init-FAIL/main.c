#include <stdio.h>
#include <stdlib.h>

int over_limit(int v);

int main(int argc, char **argv)
{
	printf("%d\n", over_limit(argc > 1 ? atoi(argv[1]) : 15));
	return 0;
}
