// A minimal check macro shared by the C++ unit tests: counts checks and failures, prints the first 30 failures.
#pragma once
#include <stdio.h>

static int g_failures = 0;
static int g_checks = 0;

#define CHECK(cond, ...)                                                \
  do {                                                                  \
    ++g_checks;                                                         \
    if (!(cond)) {                                                      \
      if (++g_failures < 30) {                                          \
        fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        fprintf(stderr, __VA_ARGS__);                                   \
        fprintf(stderr, "\n");                                          \
      }                                                                 \
    }                                                                   \
  } while (0)
