int fb(int x)
{
	return x * 10;
}
