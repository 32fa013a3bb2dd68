/* weight() reads one field of a large struct through a pointer, so gcc's IPA-SRA
 * (-fipa-sra, on at -O2) makes weight.isra.0 taking the int directly. */

struct conf {
	int verbose;
	int level;
	char name[64];
	long pad[8];
};

static __attribute__((noinline)) int weight(const struct conf *c)
{
	return c->level * 3 + 1;
}

int score(const struct conf *c)
{
	return weight(c) + 2;
}

int bonus(const struct conf *c)
{
	return weight(c) * 5;
}
