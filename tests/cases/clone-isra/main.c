#include <stdio.h>

struct conf {
	int verbose;
	int level;
	char name[64];
	long pad[8];
};

int score(const struct conf *c);
int bonus(const struct conf *c);

int main(void)
{
	struct conf c = { .level = 4 };

	printf("%d %d\n", score(&c), bonus(&c));
	return 0;
}
