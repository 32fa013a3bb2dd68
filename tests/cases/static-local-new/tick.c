int tick(int step)
{
	static int calls;

	calls += step;
	return calls * 2;
}
