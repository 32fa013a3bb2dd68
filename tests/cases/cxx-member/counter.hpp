#ifndef COUNTER_HPP
#define COUNTER_HPP

class Counter {
public:
	int bump(int by);

private:
	int value_ = 0;
};

#endif
