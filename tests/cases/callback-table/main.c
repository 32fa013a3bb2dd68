#include <stdio.h>

int run_op(const char *name, int a, int b);

int main(int argc, char **argv)
{
	printf("%d\n", run_op(argc > 1 ? argv[1] : "sub", 7, 2));
	return 0;
}
