#include <stdio.h>

int lookup_plus(const char *key);
int lookup_twice(const char *key);

int main(int argc, char **argv)
{
	printf("%d %d\n", lookup_plus(argc > 1 ? argv[1] : "key"), lookup_twice("key"));
	return 0;
}
