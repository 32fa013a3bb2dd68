#include <stdio.h>

int parse_flag(const char *s);

int main(int argc, char **argv)
{
	printf("%d\n", parse_flag(argc > 1 ? argv[1] : "-v"));
	return 0;
}
