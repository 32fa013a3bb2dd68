int limit = 10;

int over_limit(int v)
{
	return v > limit;
}
