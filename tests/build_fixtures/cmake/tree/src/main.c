int next_count(int n);
void show(int n);

int main(void)
{
	show(next_count(41));
	return 0;
}
