"""The namespace test bed, its daemon stack, fakes and fixtures: used by the tests, the demo
and the benchmarks, never installed (the ipk ships only controld/, natd/ and shared/)."""
