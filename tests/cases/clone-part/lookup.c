#include <stdio.h>
#include <string.h>

/* lookup() has a cheap early return and an expensive slow path: gcc's partial inlining
 * (-fpartial-inlining, on at -O2) splits the slow path into lookup.part.0. */

static char cache[256];
static int cached;

int lookup(const char *key)
{
	if (cached)
		return cache[0];
	for (int i = 0; key[i] && i < 255; i++) {
		cache[i] = key[i] ^ 0x5a;
		if (cache[i] == 'q')
			printf("odd key %s at %d\n", key, i);
	}
	cached = 1;
	return cache[0] + (int)strlen(key);
}

int lookup_plus(const char *key)
{
	return lookup(key) + 1;
}

int lookup_twice(const char *key)
{
	return lookup(key) * 2;
}
