__thread int budget = 5;

int spend(int n)
{
	if (n > budget)
		return -1;
	budget -= n;
	return budget;
}
