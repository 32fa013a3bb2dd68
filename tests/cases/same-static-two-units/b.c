/* Same name as a.c's helper(); only this one changes. */
static __attribute__((noinline)) int helper(int x)
{
	return x + 20;
}

int fb(int x)
{
	return helper(x) * 3;
}
