int foo_compute(int x)
{
	return x * 7;
}

int foo_version(void)
{
	return 1;
}
