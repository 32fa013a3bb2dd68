int walk(int n)
{
	if (n <= 0)
		return 0;
	return 1 + walk(n - 1);
}
