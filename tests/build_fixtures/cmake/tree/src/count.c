int next_count(int n)
{
	return n + 1;
}
