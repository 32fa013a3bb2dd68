#include <stdio.h>

int count_vowels(const char *s);

int main(int argc, char **argv)
{
	printf("%d\n", count_vowels(argc > 1 ? argv[1] : "livesplice"));
	return 0;
}
