int table[4] = { 1, 2, 3, 4 };

int table_sum(void)
{
	int s = 0;

	for (unsigned i = 0; i < sizeof(table) / sizeof(table[0]); i++)
		s += table[i];
	return s;
}
