/* noinline: keep helper() a function of its own in both units. */
static __attribute__((noinline)) int helper(int x)
{
	return x + 10;
}

int fa(int x)
{
	return helper(x) * 2;
}
