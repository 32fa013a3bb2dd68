#include <string.h>

static int op_add(int a, int b)
{
	return a + b;
}

static int op_sub(int a, int b)
{
	return a - b;
}

static int op_mul(int a, int b)
{
	return a * b;
}

/* A table of callbacks: the functions are only reachable through these pointers. */
static const struct op {
	const char *name;
	int (*fn)(int, int);
} ops[] = {
	{ "add", op_add },
	{ "sub", op_sub },
	{ "mul", op_mul },
};

int run_op(const char *name, int a, int b)
{
	for (unsigned i = 0; i < sizeof(ops) / sizeof(ops[0]); i++)
		if (strcmp(ops[i].name, name) == 0)
			return ops[i].fn(a, b);
	return 0;
}
