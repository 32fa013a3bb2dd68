int limit_default;

int effective_limit(int requested)
{
	return requested ? requested : limit_default;
}
