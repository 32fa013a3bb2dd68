/* calc.c: the arithmetic the program reports. */

int compute(int x)
{
	return x * 3 + 1;
}
