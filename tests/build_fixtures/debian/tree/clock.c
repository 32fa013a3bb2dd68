int tick_length(void)
{
	return 1000;
}
