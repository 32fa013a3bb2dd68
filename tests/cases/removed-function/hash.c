int legacy_hash(int x)
{
	return x * 2654435761u;
}

int hash(int x)
{
	return legacy_hash(x) ^ 0x55;
}
