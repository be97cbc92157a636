package snapshot

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/uffdrestore/uffdrestore/format"
)

// TestSelectRegionsIdentity: a name selects every region of that name (as
// Extract writes them), "#N" selects region N alone.
func TestSelectRegionsIdentity(t *testing.T) {
	var buf bytes.Buffer
	w, err := format.NewWriter(&buf, format.WriterOptions{ChunkSize: format.MinChunkSize})
	if err != nil {
		t.Fatal(err)
	}
	names := []string{"anon", "/lib/x.so", "anon", "#1", "anon"}
	for i, name := range names {
		w.BeginRegion(name, 0, format.ProtRead)
		w.Write(image(1000+i, uint64(i)))
		w.EndRegion()
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	r := openBytes(t, buf.Bytes())
	cases := []struct {
		sel  string
		want []int
	}{
		{"anon", []int{0, 2, 4}},
		{"#2", []int{2}},
		{"#0", []int{0}},
		{"[#]1", []int{3}}, // a name that looks like an index: a glob
		{"", []int{0, 1, 2, 3, 4}},
	}
	for _, c := range cases {
		got, err := SelectRegions(r, c.sel)
		if err != nil || !reflect.DeepEqual(got, c.want) {
			t.Errorf("SelectRegions(%q) = %v, %v, want %v", c.sel, got, err, c.want)
		}
	}
	if _, err := SelectRegions(r, "#5"); !errors.Is(err, ErrNoSuchRegion) || !strings.Contains(err.Error(), "#0 to #4") {
		t.Errorf("#5: %v", err)
	}
	if got := extract(t, buf.Bytes(), "#2"); !bytes.Equal(got, image(1002, 2)) {
		t.Error("extract #2: wrong bytes")
	}
}
