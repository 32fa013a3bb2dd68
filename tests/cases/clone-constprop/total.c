/* scaled() is only ever called with factor == 7, so gcc's IPA-CP (-fipa-cp, on at -O2)
 * makes scaled.constprop.0 with the constant folded in. */

static __attribute__((noinline)) int scaled(int x, int factor)
{
	int r = 0;

	for (int i = 0; i < x; i++)
		r += i * factor;
	return r;
}

int total_a(int x)
{
	return scaled(x, 7);
}

int total_b(int x)
{
	return scaled(x + 1, 7);
}
