#include <stdio.h>
#include <stdlib.h>

int dispatch(int op, int a, int b);

int main(int argc, char **argv)
{
	printf("%d\n", dispatch(argc > 1 ? atoi(argv[1]) : 2, 6, 3));
	return 0;
}
