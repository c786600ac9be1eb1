-- Room on every page of sms_messages for the row's next version: finishing an attempt
-- (status, attempts, outcome columns; none indexed) then updates the row in place (a HOT
-- update) instead of writing a new entry into each of the table's five indexes.
ALTER TABLE sms_messages SET (fillfactor = 70);
