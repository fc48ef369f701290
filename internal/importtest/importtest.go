// Package importtest builds the export files the tests of a bulk device
// import read (package deviceimport's own, and the node's through its
// API): lines in the format of `az iot hub device-identity export`, each
// device's keys derived from its id so that a test knows them without
// keeping them. Test data only.
package importtest

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"fmt"

	"appliance/api"
)

// Key is the key a file made by Line gives a device: which is "p" for the
// primary key, "s" for the secondary.
func Key(id, which string) string {
	sum := sha256.Sum256([]byte(which + "/" + id))
	return base64.StdEncoding.EncodeToString(sum[:])
}

// Line is an Azure export line for an enabled device with its two keys
// and the tag environment=env.
func Line(id, env string) string {
	return fmt.Sprintf(`{"id":%q,"eTag":"MA==","status":"enabled","authentication":{"symmetricKey":{"primaryKey":%q,"secondaryKey":%q},"x509Thumbprint":{"primaryThumbprint":null,"secondaryThumbprint":null},"type":"sas"},"twinETag":"AAAAAAAAAAE=","tags":{"environment":%q},"properties":{"desired":{},"reported":{}},"capabilities":{"iotEdge":true}}`,
		id, Key(id, "p"), Key(id, "s"), env)
}

// File is a file of n devices <prefix>-00001 and on, lines 1..n, with the
// bad lines given (line number -> the line) in place of the good ones.
func File(n int, prefix, env string, bad map[int]string) []byte {
	var b bytes.Buffer
	for i := 1; i <= n; i++ {
		if line, ok := bad[i]; ok {
			b.WriteString(line + "\n")
			continue
		}
		b.WriteString(Line(fmt.Sprintf("%s-%05d", prefix, i), env) + "\n")
	}
	return b.Bytes()
}

// ErrorLines are the lines a summary says failed, in its order.
func ErrorLines(sum api.ImportSummary) []int {
	var out []int
	for _, e := range sum.Errors {
		out = append(out, e.Line)
	}
	return out
}

// LargeFile is a file of n devices big-000 and on, each with its keys
// and the tags environment=prod and notes=notes: with long notes, lines
// far larger than most.
func LargeFile(n int, notes string) []byte {
	var b bytes.Buffer
	for i := range n {
		id := fmt.Sprintf("big-%03d", i)
		fmt.Fprintf(&b, `{"id":%q,"authentication":{"symmetricKey":{"primaryKey":%q,"secondaryKey":%q}},"tags":{"environment":"prod","notes":%q}}`+"\n",
			id, Key(id, "p"), Key(id, "s"), notes)
	}
	return b.Bytes()
}
