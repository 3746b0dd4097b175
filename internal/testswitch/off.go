//go:build !sniproxytest

package testswitch

// Read returns the zero Switches: this binary was built without the
// sniproxytest tag, so no test switch exists in it.
func Read() Switches { return Switches{} }
