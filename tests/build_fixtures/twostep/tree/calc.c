int calc(int x)
{
	return x * x;
}
