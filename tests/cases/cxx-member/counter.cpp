#include "counter.hpp"

int Counter::bump(int by)
{
	value_ += by;
	return value_;
}
