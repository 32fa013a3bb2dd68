int errors_seen;

int work(int x)
{
	if (x < 0)
		errors_seen++;
	return x + 1;
}
