int loudness(int level);
