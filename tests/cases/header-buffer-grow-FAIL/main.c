#include <stdio.h>
#include "record_api.h"

static char storage[64] __attribute__((aligned(8))) = { 7, 0, 0, 0, 'x' };

int main(void)
{
	const struct record *r = (const struct record *)storage;

	printf("%d %c\n", record_id(r), record_initial(r));
	return 0;
}
