/* geometry.c: scale() is small and static, so gcc -O2 inlines it into every caller and
 * emits no out-of-line copy. */

static int scale(int x)
{
	return x * 4;
}

int area(int w, int h)
{
	return scale(w) * h;
}

int volume(int w, int h, int d)
{
	return scale(w) * h * d;
}

int perimeter(int w, int h)
{
	return 2 * (w + h);
}
